/* fault.h: faytd's fault engine (fault.c), as faytd's Python sees it
 * (faytd/_build.py hands this header to cffi after core.h).
 *
 * A SPECIAL fault that a chain server answers costs no Python in faytd:
 * fayt_fast_poll hands every fd of the engine (the regions' userfaultfds,
 * the members' answer eventfds, its deadline timerfd) to fayt_faults_event,
 * which reads the faults, posts requests into the channels (pager.h),
 * spins for the answers, reaps them, checks every field the server wrote,
 * and resolves the faults (UFFDIO_COPY, _CONTINUE, _POISON, _WRITEPROTECT).
 * Python configures it (chains, members, regions: their ids are Python's),
 * and drains what it must act on: log lines, a member to drop (a protocol
 * error) and a region to close (its userfaultfd failed).  When one is
 * queued the engine rings `notify_fd`, an eventfd that faytd's Python
 * watches; that is the only way back to Python.
 *
 * Objects are named by their fd: a region by its uffd, a member by its
 * answer eventfd (each unique while it is open); a chain by its id.
 * State lives in core->faults (made by fayt_faults_init).
 */
#ifndef FAYT_CORE_FAULT_H
#define FAYT_CORE_FAULT_H

#include <stdint.h>

struct fayt_core;

/* What a region (or the whole engine) counted. */
struct fayt_fault_counts {
    uint64_t faults;           /* fault events read */
    uint64_t fetched;          /* pages that went in (copied or mapped) */
    uint64_t mapped;           /* of them, mapped by reference (UFFDIO_CONTINUE) */
    uint64_t failed;           /* requests failed (the access got SIGBUS) */
    uint64_t write_reports;    /* write reports acknowledged */
    uint64_t in_one_call;      /* faults answered within the event that read them
                                  (posted, spun for, resolved: no trip through the loop) */
} __attribute__((packed));

/* The engine's public state; `priv` is C's alone. */
struct fayt_faults {
    struct fayt_fault_counts total;   /* every region's, closed ones included */
    uint64_t c_events;         /* engine fds served inside fayt_fast_poll */
    uint64_t py_events;        /* engine fds Python handed over (fayt_faults_event from
                                  Python: an fd a catch-up took from epoll) */
    uint64_t requests;         /* requests made */
    uint64_t nevents;          /* events queued for Python */
    uint64_t lost_events;      /* events dropped: the queue was full */
    int64_t spin_ns;           /* spin this long for an answer after posting */
    int32_t notify_fd;         /* eventfd: readable while events are queued */
    int32_t timer_fd;          /* the deadlines' timerfd */
    uint32_t trace;            /* 1: queue a FAYT_FAULT_EV_TRACE per answer and per end
                                  (faytd/trace.py sets it while a timeline trace runs) */
    struct fayt_faults_priv *priv;
} __attribute__((packed));

/* Make core->faults (its eventfd and timerfd, which the caller watches for
 * readability): 0 or errno.  fini frees everything and closes both fds. */
int fayt_faults_init(struct fayt_core *k, int64_t spin_ns);
void fayt_faults_fini(struct fayt_core *k);

/* Chains.  add: 0, EEXIST, ENOMEM.  del: the chain takes no new region or
 * member; it goes when its last member and region have. */
int fayt_fault_chain_add(struct fayt_core *k, uint32_t chain_id, const char *name,
                         uint32_t flags, uint32_t timeout_ms);
void fayt_fault_chain_del(struct fayt_core *k, uint32_t chain_id);

/* Faults injected into a chain's page requests (faytd/injection.py,
 * docs/testing.md).  Each new page request of the chain is an event n
 * (0, 1, ... since the rule was set); it fires if n >= after, fewer than
 * count fired (0: no bound) and splitmix64(seed + n) % 1000000 < ppm.
 * FAIL: the request fails with err (the client's access gets SIGBUS);
 * SLOW: it waits delay_ms before it goes to the chain's first server (the
 * chain's timeout starts then).  kind NONE clears the rule.  inject: 0,
 * ENOENT (no such chain), EINVAL.  injected: its events and faults. */
#define FAYT_FAULT_INJECT_NONE 0
#define FAYT_FAULT_INJECT_FAIL 1
#define FAYT_FAULT_INJECT_SLOW 2
struct fayt_fault_inject {
    uint32_t kind;
    int32_t err;
    uint32_t delay_ms;
    uint32_t after;
    uint32_t count;
    uint32_t ppm;
    uint64_t seed;
    uint64_t fired;
} __attribute__((packed));
int fayt_fault_chain_inject(struct fayt_core *k, uint32_t chain_id,
                            const struct fayt_fault_inject *rule);
int fayt_fault_chain_injected(struct fayt_core *k, uint32_t chain_id, uint64_t *events,
                              uint64_t *fired);

/* Members.  add: the channel `ch` (fayt_pager_bytes(nslots, run_max)
 * bytes, mapped by the caller until member_del) is initialised and the
 * member goes last in its chain; efd is its answer eventfd.  0, ENOENT (no
 * such chain), EBADF, EEXIST, ENOMEM.  del: its requests in flight fail
 * with err (each logged "chain ...: server pid ... <why> with a request in
 * flight: failed"), the channel is closed (the server is woken); the caller
 * then unmaps ch and closes efd.  A member the engine dropped (a protocol
 * error) is deleted by the same call. */
uint64_t fayt_pager_bytes(uint32_t nslots, uint32_t run_max);
int fayt_fault_member_add(struct fayt_core *k, uint32_t chain_id, void *ch, uint32_t nslots,
                          uint32_t run_max, int efd, int32_t pid);
void fayt_fault_member_del(struct fayt_core *k, int efd, int err, const char *why);

/* Regions.  add: 0, ENOENT (no such chain), EBADF, EEXIST, ENOMEM.  share
 * (0: none) groups the regions of a SPECIAL|SHARE share-point: they share
 * their requests.  backing_efd/backing_id: the member whose backing the
 * region maps (0/0: none): only that member's requests carry BACKED and
 * may be answered MAPPED.  wp: write reports.  del: its requests are
 * cancelled (a request another region of its share waits for is handed to
 * it); the caller closes uffd.  counts: 0, or ENOENT. */
int fayt_fault_region_add(struct fayt_core *k, int uffd, uint32_t region_id, uint64_t addr,
                          uint64_t length, uint32_t chain_id, const char *message,
                          uint32_t message_length, int wp, uint32_t share, int32_t pid,
                          int backing_efd, uint32_t backing_id);
void fayt_fault_region_del(struct fayt_core *k, int uffd);
int fayt_fault_region_counts(struct fayt_core *k, int uffd, struct fayt_fault_counts *out);

/* Is fd one of the engine's (a region's uffd, a member's eventfd, the
 * timerfd)?  event: serve it (1), or 0 if it is not the engine's. */
int fayt_faults_owns(struct fayt_core *k, int fd);
int fayt_faults_event(struct fayt_core *k, int fd, uint32_t events);

/* Events for Python, oldest first: how many were copied to out[max]. */
#define FAYT_FAULT_EV_LOG    1  /* log `text` at `level` (Python's logging levels) */
#define FAYT_FAULT_EV_DROP   2  /* drop the member of eventfd `fd` (err, text: why) */
#define FAYT_FAULT_EV_CLOSE  3  /* close the region of uffd `fd` (its uffd failed) */
#define FAYT_FAULT_EV_TRACE  4  /* the timeline trace (faytd/trace.py): `text` is
                                   "A <req> <region> <client pid> <server pid> <verdict> <error>
                                   <hop> <t0 ns> <now ns> <offset>" for a server's answer, or
                                   "D <req> <region> <client pid> <errno> <t0 ns> <now ns>
                                   <offset>" when the request ends (0: the page is in) */
struct fayt_fault_event {
    uint32_t kind;
    int32_t level;
    int32_t fd;
    int32_t err;
    char text[240];
} __attribute__((packed));
int fayt_faults_drain(struct fayt_core *k, struct fayt_fault_event *out, int max);

#endif
