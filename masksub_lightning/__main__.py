"""``python -m masksub_lightning``: the ``masksub`` command (for launchers that take a module, e.g. torchrun -m)."""

from masksub_lightning.commands import main

if __name__ == "__main__":
    main()
