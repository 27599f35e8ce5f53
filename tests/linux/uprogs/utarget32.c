/* A 32-bit (i386) program for user probes in compat processes on the x86_64 kernel: calls
 * utarget32(i, i * i, -i) and then uname32(argv[0]) for i = 1..N (N = argv[1], default 3), then exits 0.
 * Each call's arguments are known (cdecl: all of them on the user stack); utarget32 returns a + b + c,
 * uname32 the length of its string.
 *
 * Freestanding: its own _start and `int $0x80` system calls, no C library. x86_64 gcc and binutils emit and
 * link i386 code as they are (gcc -m32 -nostdlib -static); only a 32-bit libc would need gcc-multilib. */

volatile long sink;

__attribute__((noinline, noipa)) long utarget32(long a, long b, long c)
{
    return a + b + c;
}

__attribute__((noinline, noipa)) long uname32(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    return n;
}

static __attribute__((noreturn)) void exit_group(long code)
{
    __asm__ volatile("int $0x80" : : "a"(252), "b"(code)); /* __NR_exit_group on i386 */
    __builtin_unreachable();
}

/* Called by _start with the initial stack: argc, then argv[0..argc-1], NULL, the environment. */
__attribute__((noreturn, used)) void start_c(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    long n = 3;
    if (argc > 1) {
        n = 0;
        for (const char *p = argv[1]; *p >= '0' && *p <= '9'; p++)
            n = n * 10 + (*p - '0');
    }
    for (long i = 1; i <= n; i++) {
        sink += utarget32(i, i * i, -i);
        sink += uname32(argv[0]);
    }
    exit_group(0);
}

__asm__(".globl _start\n"
        "_start:\n"
        "    xorl %ebp, %ebp\n"
        "    movl %esp, %eax\n"
        "    andl $-16, %esp\n"
        "    subl $12, %esp\n"
        "    pushl %eax\n" /* start_c(stack), with the stack 16-byte aligned at the call */
        "    call start_c\n"
        "    hlt\n");
