/* objpool.c: faytd's pool of fresh POSIX shm objects, and their unlinks
 * (fayt/kernel.h).
 *
 * Every portal gets a shared-memory object of its own (an fd grants all of
 * its object, so objects are never shared between portals nor reused).
 * Making one (shm_open O_EXCL, ftruncate, its first page) and unlinking one
 * cost tens of microseconds of system calls here; a thread of faytd does
 * both ahead of need and after the fact, so that neither lies on a reply's
 * path.  The thread is plain C (no GIL) and touches only its own lists,
 * under one mutex.  It sleeps when there is nothing to do: for 2 ms at a
 * time while work keeps coming (the loop wakes it only when the pool runs
 * below half or many names wait, so a busy faytd pays a wake-up now and
 * then, not per call), for ever once it has been idle 100 ms (then the
 * first piece of work wakes it).  A new object is all zeros, as a
 * scrubbed frame is.  Names carry faytd's run tag: a killed faytd's
 * objects are swept by the next one (frames.sweep_stale).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "fayt/kernel.h"

#define QUEUE_WAKE 16               /* names waiting that wake the thread */
#define BUSY_NAP_NS 2000000         /* its nap while work keeps coming */
#define IDLE_AFTER_NS 100000000     /* idle this long: sleep until woken */

struct pooled {
    int fd;
    char name[FAYT_OBJ_NAME_MAX];
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv;
static pthread_t thread;
static int running, stopping, sleeping, deep;
static char prefix[FAYT_OBJ_NAME_MAX - 32];
static uint32_t target;
static struct pooled *ready;
static uint32_t nready;
static char (*queue)[FAYT_OBJ_NAME_MAX];
static uint32_t nqueued, cap_queue;

/* A new one-page object with its page made: its fd, or -errno. */
static int make_object(char *name)
{
    for (int tries = 0; tries < 8; tries++) {
        unsigned char rnd[12];
        ssize_t got = 0;
        while (got < (ssize_t)sizeof rnd) {
            ssize_t r = getrandom(rnd + got, sizeof rnd - got, 0);
            if (r < 0 && errno != EINTR)
                return -errno;
            if (r > 0)
                got += r;
        }
        int n = snprintf(name, FAYT_OBJ_NAME_MAX, "%s", prefix);
        for (int i = 0; i < 12; i++)
            n += snprintf(name + n, FAYT_OBJ_NAME_MAX - n, "%02x", rnd[i]);
        int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) {
            if (errno == EEXIST)
                continue;
            return -errno;
        }
        if (ftruncate(fd, 4096) < 0 || pwrite(fd, "", 1, 0) != 1) {
            int e = errno ? errno : EIO;
            close(fd);
            shm_unlink(name);
            return -e;
        }
        return fd;
    }
    return -EEXIST;
}

static void nap(int64_t ns)
{
    struct timespec d;
    fayt_deadline(ns, &d);          /* the condvar waits on CLOCK_MONOTONIC */
    pthread_cond_timedwait(&cv, &mu, &d);
}

static void *janitor(void *unused)
{
    (void)unused;
    int64_t last_work = fayt_now_ns();
    int failing = 0;
    pthread_mutex_lock(&mu);
    while (!stopping) {
        if (nqueued) {
            char name[FAYT_OBJ_NAME_MAX];
            memcpy(name, queue[--nqueued], FAYT_OBJ_NAME_MAX);
            pthread_mutex_unlock(&mu);
            shm_unlink(name);
            pthread_mutex_lock(&mu);
            last_work = 0;
            continue;
        }
        if (nready < target && !failing) {
            struct pooled p;
            pthread_mutex_unlock(&mu);
            p.fd = make_object(p.name);
            pthread_mutex_lock(&mu);
            if (p.fd < 0)
                failing = 1;            /* out of files or memory: try again later */
            else
                ready[nready++] = p;
            last_work = 0;
            continue;
        }
        int64_t now = fayt_now_ns();
        if (last_work == 0)
            last_work = now;
        sleeping = 1;
        if (failing) {
            deep = 0;
            nap(100000000);
            failing = 0;
        } else if (now - last_work < IDLE_AFTER_NS) {
            deep = 0;
            nap(BUSY_NAP_NS);
        } else {
            deep = 1;
            pthread_cond_wait(&cv, &mu);
        }
        sleeping = deep = 0;
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

int fayt_objpool_start(const char *pfx, uint32_t want)
{
    pthread_mutex_lock(&mu);
    if (running) {
        pthread_mutex_unlock(&mu);
        return EALREADY;
    }
    if (strlen(pfx) >= sizeof prefix) {
        pthread_mutex_unlock(&mu);
        return ENAMETOOLONG;
    }
    strcpy(prefix, pfx);
    target = want;
    ready = calloc(want ? want : 1, sizeof *ready);
    if (!ready) {
        pthread_mutex_unlock(&mu);
        return ENOMEM;
    }
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&cv, &a);
    pthread_condattr_destroy(&a);
    stopping = 0;
    /* The thread takes no signal: faytd's handlers run on its main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int e = pthread_create(&thread, NULL, janitor, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        free(ready);
        ready = NULL;
        pthread_mutex_unlock(&mu);
        return e;
    }
    running = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

int fayt_objpool_take(uint64_t length, char *name_out)
{
    int fd = -1;
    pthread_mutex_lock(&mu);
    if (running && nready) {
        struct pooled *p = &ready[--nready];
        fd = p->fd;
        memcpy(name_out, p->name, FAYT_OBJ_NAME_MAX);
    }
    if (running && sleeping && (deep || nready < target / 2))
        pthread_cond_signal(&cv);
    int have_prefix = prefix[0] != 0;
    pthread_mutex_unlock(&mu);
    if (fd < 0) {
        if (!have_prefix)
            return -EINVAL;
        fd = make_object(name_out);
        if (fd < 0)
            return fd;
    }
    if (length != 4096 && ftruncate(fd, (off_t)length) < 0) {
        int e = errno;
        close(fd);
        shm_unlink(name_out);
        return -e;
    }
    return fd;
}

void fayt_objpool_release(const char *name)
{
    pthread_mutex_lock(&mu);
    if (running) {
        if (nqueued == cap_queue) {
            uint32_t cap = cap_queue ? cap_queue * 2 : 64;
            void *q = realloc(queue, (size_t)cap * FAYT_OBJ_NAME_MAX);
            if (!q) {
                pthread_mutex_unlock(&mu);
                shm_unlink(name);           /* no room to queue it: now */
                return;
            }
            queue = q;
            cap_queue = cap;
        }
        strncpy(queue[nqueued], name, FAYT_OBJ_NAME_MAX - 1);
        queue[nqueued][FAYT_OBJ_NAME_MAX - 1] = 0;
        nqueued++;
        if (sleeping && (deep || nqueued >= QUEUE_WAKE))
            pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
        return;
    }
    pthread_mutex_unlock(&mu);
    shm_unlink(name);
}

void fayt_objpool_stop(void)
{
    pthread_mutex_lock(&mu);
    if (!running) {
        pthread_mutex_unlock(&mu);
        return;
    }
    stopping = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(thread, NULL);
    pthread_mutex_lock(&mu);
    running = 0;
    for (uint32_t i = 0; i < nready; i++) {
        close(ready[i].fd);
        shm_unlink(ready[i].name);
    }
    for (uint32_t i = 0; i < nqueued; i++)
        shm_unlink(queue[i]);
    nready = nqueued = 0;
    free(ready);
    ready = NULL;
    pthread_cond_destroy(&cv);
    pthread_mutex_unlock(&mu);
}
