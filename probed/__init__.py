"""probed: kprobes for QEMU guests, over the GDB remote serial protocol."""

__version__ = "0.1.0"
