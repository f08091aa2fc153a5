try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C in the instant before main() takes it over
    import sys
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
