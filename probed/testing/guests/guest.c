/* The deterministic test guest: the same program for i386 and x86_64 (see README.md for the contract). */

#define NOIPA __attribute__((noipa, used))

typedef unsigned long ulong;

volatile ulong turns;
volatile ulong calls;
volatile ulong calls_cpu[2];
volatile ulong watched;
volatile ulong writes;
volatile ulong read_me = 0x5eed;
volatile ulong reads;
volatile ulong ap_started;
const char *volatile last_name;
const char *const names[4] = {"alpha", "beta", "gamma", "delta"};

void reg_change(void);
void start_ap(void);

#define LAPIC ((volatile unsigned int *)0xFEE00000UL)

static unsigned int cpu_index(void)
{
    return (LAPIC[0x20 / 4] >> 24) & 1;
}

static void outb(unsigned short port, unsigned char value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void serial_puts(const char *s)
{
    for (; *s; s++)
        outb(0x3f8, (unsigned char)*s);
}

/* The probe target: `calls` is incremented after the entry, so at a probe on the first instruction of
 * call n, calls == n - 1 (on a single CPU). */
NOIPA long probe_target(long a, long b, const char *name)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&calls_cpu[cpu_index()], 1, __ATOMIC_SEQ_CST);
    last_name = name;
    return a + b;
}

NOIPA long elsewhere(long x)
{
    return x * 2;
}

/* One store to `watched` per call (value turn * 3), then `writes` counts it. */
NOIPA void write_watched(ulong turn)
{
    watched = turn * 3;
    writes = writes + 1;
}

NOIPA ulong read_watched(void)
{
    ulong v = read_me;
    reads = reads + 1;
    return v;
}

/* Recursion with a known value at every depth: depth_sum(n) = n + (n - 1) + ... + 0, one call per depth
 * (not a loop: the addition happens after the inner call returns). For return probes. */
NOIPA long depth_sum(long n)
{
    if (n == 0)
        return 0;
    return n + depth_sum(n - 1);
}

static void send_ipi(unsigned int low)
{
    LAPIC[0x310 / 4] = 0;
    LAPIC[0x300 / 4] = low;
    while (LAPIC[0x300 / 4] & (1u << 12))
        ;
}

extern char ap_tramp_start[], ap_tramp_end[];

/* INIT-SIPI-SIPI to every other CPU; harmless when there is none. CPU 0 does not wait. */
void start_ap(void)
{
    volatile char *dst = (volatile char *)0x8000UL;
    for (char *p = ap_tramp_start; p < ap_tramp_end; p++)
        *dst++ = *p;
    LAPIC[0xF0 / 4] = 0x1FF;          /* software-enable the local APIC */
    send_ipi(0x000C4500);             /* INIT, all excluding self */
    send_ipi(0x000C4608);             /* STARTUP at 0x8000 */
    send_ipi(0x000C4608);
}

void ap_main(void)
{
    ap_started = 1;
    for (ulong k = 1;; k++)
        probe_target(0x100000 + k, k, names[k % 4]);
}

void cpu0_main(void)
{
    serial_puts("probed guest up (" GUEST_ARCH ")\n");
    start_ap();
    for (ulong turn = 1;; turn++) {
        probe_target(turn, turn * 3 + 1, names[turn % 4]);
        elsewhere(turn);
        reg_change();
        write_watched(turn);
        read_watched();
        depth_sum(turn % 4);
        turns = turns + 1;
    }
}
