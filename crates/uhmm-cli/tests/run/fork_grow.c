/* A forked child grows an inherited malloc block in place (realloc) on
 * one thread while another thread of the child forks. Run under `uhmm
 * run` with slow_mmap.so in LD_PRELOAD: the growing thread is held for
 * 300 ms inside uhmm's library, in the mapping of the grown part, and
 * the other thread forks meanwhile. Prints what happened; exit status 0
 * if everything did, 1 if not, 3 if slow_mmap.so is not loaded. A child
 * that hangs is ended by SIGALRM after 10 s (status 1 in the parent). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1UL << 20)

static uint64_t *block;
static void *grown;

static void *grow(void *arg) {
    (void)arg;
    grown = realloc(block, 8 * MIB);
    return NULL;
}

static int child(void) {
    alarm(10);
    void (*arm)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "slow_mmap_arm");
    int (*entered)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "slow_mmap_entered");
    if (!arm || !entered) {
        printf("slow_mmap.so is not loaded\n");
        return 3;
    }
    arm(300);
    pthread_t t;
    if (pthread_create(&t, NULL, grow, NULL))
        return 1;
    /* Fork while the growing thread is held inside the library. */
    for (int i = 0; i < 500 && !entered(); i++) {
        struct timespec ms = {0, 1000000L};
        nanosleep(&ms, NULL);
    }
    int held = entered();
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    int st = 0;
    waitpid(pid, &st, 0);
    pthread_join(t, NULL);
    uint64_t *g = grown;
    int ok = g != NULL;
    for (size_t i = 0; ok && i < 2 * MIB / 8; i++)
        ok = g[i] == i * 3 + 1;
    printf("held %d, forked %d, grown %s, data %s\n", held,
           pid > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
           g == block ? "in place" : g ? "moved" : "failed", ok ? "ok" : "WRONG");
    fflush(stdout);
    return !(held && ok && pid > 0);
}

int main(void) {
    block = malloc(2 * MIB);
    if (!block)
        return 1;
    for (size_t i = 0; i < 2 * MIB / 8; i++)
        block[i] = i * 3 + 1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0)
        exit(child());
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFSIGNALED(st)) {
        printf("child killed by signal %d (hung)\n", WTERMSIG(st));
        return 1;
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
