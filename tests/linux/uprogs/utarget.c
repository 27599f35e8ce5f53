/* A user-space program for user-probe tests: calls utarget(i, i * i), uname_len(argv[0]) and udepth(i)
 * for i = 1..N (N = argv[1], default 3), then exits 0. Each call's arguments and return value are known:
 * utarget returns a + b, uname_len the length of its string, udepth(n) = n + udepth(n - 1) (recursive,
 * udepth(0) = 0). Built static and static-pie.
 * With a second argument "hold", it first prints its PID and waits for SIGUSR1: its file stays mapped
 * while other programs run, and its calls come when the host says (`utarget 3 hold | { read pid; ...;
 * kill -USR1 $pid; }`). With "twice", it makes its calls, then prints its PID and waits for SIGUSR1, then
 * makes them again. With "threads", two threads make the calls at once, thread t (1, 2) with
 * utarget(100 * t + i, i * i). */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile long sink;

__attribute__((noinline, noipa)) long utarget(long a, long b)
{
    return a + b;
}

__attribute__((noinline, noipa)) long uname_len(const char *s)
{
    return (long)strlen(s);
}

__attribute__((noinline, noipa, optimize("no-optimize-sibling-calls"))) long udepth(long n)
{
    if (n <= 0)
        return 0;
    long below = udepth(n - 1);
    sink += 0; /* keeps the recursion a real call, not a loop */
    return n + below;
}

static void on_usr1(int sig)
{
    (void)sig;
}

static void wait_for_usr1(void)
{
    sigset_t usr1, none;
    sigemptyset(&usr1);
    sigemptyset(&none);
    sigaddset(&usr1, SIGUSR1);
    signal(SIGUSR1, on_usr1);
    sigprocmask(SIG_BLOCK, &usr1, NULL); /* no lost wake-up between the print and the wait */
    printf("%d\n", (int)getpid());
    fflush(stdout);
    sigsuspend(&none);
}

static void calls_from(long base, long n, const char *name)
{
    for (long i = 1; i <= n; i++) {
        sink += utarget(base + i, i * i);
        sink += uname_len(name);
        sink += udepth(i);
    }
}

static void calls(long n, const char *name)
{
    calls_from(0, n, name);
}

static long thread_calls;
static const char *thread_name;

static void *thread_main(void *arg)
{
    calls_from(100 * (long)arg, thread_calls, thread_name);
    return NULL;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 3;
    int twice = argc > 2 && strcmp(argv[2], "twice") == 0;
    if (argc > 2 && strcmp(argv[2], "threads") == 0) {
        pthread_t threads[2];
        thread_calls = n;
        thread_name = argv[0];
        for (long t = 0; t < 2; t++)
            pthread_create(&threads[t], NULL, thread_main, (void *)(t + 1));
        for (long t = 0; t < 2; t++)
            pthread_join(threads[t], NULL);
        return 0;
    }
    if (argc > 2 && !twice)
        wait_for_usr1();
    calls(n, argv[0]);
    if (twice) {
        wait_for_usr1();
        calls(n, argv[0]);
    }
    return 0;
}
