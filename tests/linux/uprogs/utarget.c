/* A user-space program for user-probe tests: calls utarget(i, i * i) and then uname_len(argv[0]) for
 * i = 1..N (N = argv[1], default 3), then exits 0. Each call's arguments and return value are known:
 * utarget returns a + b, uname_len the length of its string. Built static and static-pie. */
#include <stdlib.h>
#include <string.h>

volatile long sink;

__attribute__((noinline, noipa)) long utarget(long a, long b)
{
    return a + b;
}

__attribute__((noinline, noipa)) long uname_len(const char *s)
{
    return (long)strlen(s);
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 3;
    for (long i = 1; i <= n; i++) {
        sink += utarget(i, i * i);
        sink += uname_len(argv[0]);
    }
    return 0;
}
