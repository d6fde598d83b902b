/* tests/test_sandbox_hostile.py: system calls a hostile guest would try, each "held" when it fails (built static, run inside the sandbox). */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>

static pid_t main_pid;

static void report(const char *name, long result) {
    if (result == 0 && getpid() != main_pid)
        _exit(0);  /* a child that a clone made */
    printf("PROBE %s %s %d\n", name, result < 0 ? "held" : "escaped", result < 0 ? errno : 0);
    errno = 0;
}

static long int80_getpid(void) {  /* the i386 ABI: getpid is 20 */
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20) : "memory");
    if (ret < 0) {
        errno = -ret;
        return -1;
    }
    return ret;
}

int main(void) {
    char buf[256] = {0};
    uint64_t clone_args[11] = {CLONE_NEWUSER, 0, 0, 0, SIGCHLD};
    main_pid = getpid();
    setvbuf(stdout, NULL, _IONBF, 0);
    report("keyctl", syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 1));
    report("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, -3));
    report("ptrace", syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0));
    report("unshare-user", syscall(SYS_unshare, CLONE_NEWUSER));
    report("clone-newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    report("clone3", syscall(435, clone_args, 88));
    report("setns", syscall(SYS_setns, open("/proc/self/ns/uts", 0), 0));
    long inherited = -1;  /* any namespace fd the sandbox's setup left open */
    for (int fd = 3; fd < 64; fd++)
        if (syscall(SYS_setns, fd, 0) == 0)
            inherited = 0;
    report("setns-inherited", inherited);
    report("io_uring", syscall(425, 1, buf));
    report("bpf", syscall(SYS_bpf, 0 /* MAP_CREATE */, buf, 72));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("open_tree", syscall(428, -100, "/", 1 /* CLONE */));
    report("fsopen", syscall(430, "tmpfs", 0));
    report("int80", int80_getpid());
    return 0;
}
