"""`python -m simclr_cli` and `accelerate launch -m simclr_cli ...`."""

from simclr_cli.cli import main

if __name__ == "__main__":
    main()
