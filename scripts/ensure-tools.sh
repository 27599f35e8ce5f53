#!/bin/sh
# Checks for the emulators, debugger and compiler the tests and the demo need.
# As root on Debian it installs what is missing; otherwise it says exactly what to install.
need=""
command -v qemu-system-i386   >/dev/null 2>&1 || need="$need qemu-system-x86"
command -v qemu-system-x86_64 >/dev/null 2>&1 || case "$need" in *qemu-system-x86*) ;; *) need="$need qemu-system-x86";; esac
command -v qemu-system-aarch64 >/dev/null 2>&1 || need="$need qemu-system-arm"
command -v qemu-system-riscv64 >/dev/null 2>&1 || need="$need qemu-system-misc"
command -v gdb  >/dev/null 2>&1 || need="$need gdb"
command -v gcc  >/dev/null 2>&1 || need="$need gcc"
command -v ld   >/dev/null 2>&1 || need="$need binutils"
command -v cpio >/dev/null 2>&1 || need="$need cpio"
command -v tmux >/dev/null 2>&1 || need="$need tmux"
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need="$need python3-venv"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq $need >/dev/null || { echo "apt-get install$need failed" >&2; exit 1; }
else
    echo "missing tools. Install them with:  sudo apt-get install$need" >&2
    exit 1
fi
