#!/bin/busybox sh
# /init of the probed test initramfs (PID 1, root). Markers the host waits for, in order:
#   console (ttyS0): "PROBED INIT", "PROBED KERNEL <uname -r>", "WORKLOAD START"
#   ttyS1:           gzip of /proc/kallsyms, then a line "PROBED KALLSYMS END"
# Kernel argument probed.kallsyms=skip leaves out the dump (the host has it cached for this very kernel).
# Kernel argument probed.modloop: a second loop loads /lib/modules/dummy.ko, reads /proc/net/dev exactly
# MODLOOP_READS times (each read calls dummy_get_stats64 once, for dummy0), unloads it, and starts over.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "PROBED INIT"
echo "PROBED KERNEL $(uname -r)"
case " $(cat /proc/cmdline) " in
*" probed.kallsyms=skip "*) ;;
*)
    # Addresses in /proc/kallsyms read as zero unless kptr_restrict is 0 (we are root, so 0 is enough).
    echo 0 > /proc/sys/kernel/kptr_restrict
    # raw: no newline translation, the gzip stream must arrive byte for byte.
    stty -F /dev/ttyS1 raw -echo
    gzip -c /proc/kallsyms > /dev/ttyS1
    echo "PROBED KALLSYMS END" > /dev/ttyS1
    ;;
esac
# The host's shell channel (ttyS2): one command per line, run by sh; its output comes back on ttyS2,
# followed by "PROBED DONE <exit status>". Commands run one at a time; `cmd &` returns at once.
stty -F /dev/ttyS2 raw -echo
(
    while IFS= read -r line; do
        sh -c "$line" > /tmp/.probed-out 2>&1
        rc=$?
        cat /tmp/.probed-out
        echo "PROBED DONE $rc"
    done < /dev/ttyS2 > /dev/ttyS2
) &
MODLOOP_READS=5
case " $(cat /proc/cmdline) " in
*" probed.modloop "*)
    (
        while true; do
            insmod /lib/modules/dummy.ko
            i=0
            while [ $i -lt $MODLOOP_READS ]; do
                cat /proc/net/dev > /dev/null
                usleep 100000
                i=$((i + 1))
            done
            rmmod dummy
            usleep 300000
        done
    ) &
    ;;
esac
# probed-open: a process of a known name (a script's comm is its file name) that prints its PID and the CPU it
# is pinned to, then opens a file that exists and one that does not (stderr to /dev/null: a third open).
printf '#!/bin/sh\necho "PROBED OPEN pid=$$ cpu=$1"\nread -r line < /etc/hostname\n{ read -r line < /nonexistent; } 2>/dev/null\n' > /bin/probed-open
chmod 755 /bin/probed-open
CPUS=$(nproc)
echo "WORKLOAD START"
# Deterministic file and process work for probes to see, at a modest pace.
while true; do
    cat /etc/hostname > /dev/null
    echo x > /tmp/f
    ls / > /dev/null
    /bin/true
    cpu=0
    while [ $cpu -lt $CPUS ]; do
        taskset -c $cpu /bin/probed-open $cpu
        cpu=$((cpu + 1))
    done
    usleep 20000
done
