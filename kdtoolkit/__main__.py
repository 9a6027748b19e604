"""`python -m kdtoolkit ...`: the entry point `torchrun -m kdtoolkit distill ...` uses."""

from kdtoolkit.cli import main

if __name__ == "__main__":
    main()
