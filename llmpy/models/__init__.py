"""Model families: each a memory plan plus forward/backward over a backend."""
