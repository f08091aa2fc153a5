"""Model families: `base` (what every family shares: the Model machinery, configs, the registry entry), `params`
(ParamSpec and the flat parameter layout), `decode` (generation with state), and one file per family (`gpt2`)."""
