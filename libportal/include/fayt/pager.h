/* fayt/pager.h: SPECIAL portals, chains and page requests.
 *
 * A SPECIAL portal is a region whose pages come from a chain of servers.  The
 * client maps the region, registers it with a userfaultfd(2) and hands the
 * fd to faytd with the portal() call; faytd reads the fault events.
 *
 * A chain server that joins a chain gets a channel: one sealed memfd
 * shared with faytd, holding a fayt_pager_header and `nslots` slots.  A slot
 * is one page request: a struct fayt_page_request (FAYT_PAGER_DESC_SIZE
 * bytes with its padding) followed by run_max bytes of page data.  Slots move
 * between two single-producer rings of slot numbers:
 *   req_ring  faytd -> server: posted by faytd's fault engine
 *             (faytd/core/fault.c), taken with fayt_pager_take;
 *   ans_ring  server -> faytd: fayt_pager_answer, reaped by the engine.
 * A slot is in at most one ring, so neither ring can overflow.  The doorbells:
 * the server sleeps on a futex on req_head (server_waiting says so); faytd
 * sleeps in its event loop on an eventfd that the server writes after an
 * answer (`rung` keeps at most one write outstanding).
 *
 * Answers by reference (backings).  A chain server may declare one of its
 * own ANON portals the backing for a message (FAYT_SYS_CHAIN_BACK): a
 * SPECIAL portal of that message, no longer than the backing, made while it
 * is declared, then maps the backing's shm object MAP_PRIVATE from offset 0
 * (the client gets a read-only fd; faytd says so with
 * FAYT_PORTAL_REPLY_BACKED) and registers it MISSING|MINOR.  Requests to
 * that server carry FAYT_PAGE_BACKED and the backing's id; it may answer
 * FAYT_PAGE_MAPPED ("these pages are in my backing at the same offsets"),
 * and faytd maps the backing's own pages with UFFDIO_CONTINUE: no copy.
 * What follows (the Linux semantics of a private file mapping):
 * - a page supplied by reference is the server's page until the client
 *   writes it; the write makes a private copy (copy-on-write), so nothing a
 *   client does reaches the server's memory;
 * - the server's later writes to such a page are seen by the client until
 *   the client writes that page;
 * - the whole backing is readable by every client whose region maps it (a
 *   server that needs per-page secrecy answers with DATA instead);
 * - a backing serves only regions no longer than itself; a chain with
 *   write reports is never answered by reference.
 * Numbers are ABI: never reuse a retired one.
 */
#ifndef FAYT_PAGER_H
#define FAYT_PAGER_H

#include <stdint.h>

#define FAYT_PAGER_MAGIC       0x46504752   /* "FPGR" */
#define FAYT_PAGER_SLOTS_MAX   64
#define FAYT_PAGER_RUN_MAX     4194304      /* data bytes one slot may hold */
#define FAYT_PAGER_HEADER_SIZE 4096         /* slots start here */
#define FAYT_PAGER_DESC_SIZE   8192         /* a slot's data starts here */

/* fayt_pager_header.state */
#define FAYT_PAGER_LIVE   0
#define FAYT_PAGER_CLOSED 1   /* the server left the chain or faytd shut down */

/* fayt_page_request.access */
#define FAYT_ACCESS_READ  1   /* a read of a page not yet supplied */
#define FAYT_ACCESS_WRITE 2   /* the first write to a page (supplied or not) */

/* fayt_page_request.flags */
#define FAYT_PAGE_PRESENT   0x1   /* a write report: the page is there, no data wanted */
#define FAYT_PAGE_CANCELLED 0x2   /* faytd: the client went away; the answer is dropped */
#define FAYT_PAGE_BACKED    0x4   /* the region maps this server's backing `backing`: MAPPED may answer */

/* fayt_page_request.verdict: the server's answer */
#define FAYT_PAGE_PENDING 0
#define FAYT_PAGE_DATA    1   /* answer_length bytes of data from `offset` on */
#define FAYT_PAGE_FORWARD 2   /* pass the request to the next server of the chain */
#define FAYT_PAGE_FAIL    3   /* fail the access with `error` (the client gets SIGBUS) */
#define FAYT_PAGE_MAPPED  4   /* BACKED only: answer_length bytes from `offset` on are in this
                               * server's backing at the same offsets: faytd maps them
                               * (UFFDIO_CONTINUE); a page the backing lacks ends the run, and
                               * if it is the faulting one the access gets SIGBUS */

/* chain_join flags */
#define FAYT_CHAIN_WRITE_REPORTS 0x1   /* this chain wants the first write to each page */
#define FAYT_CHAIN_FLAGS         0x1

struct fayt_pager_header {
    uint32_t magic;
    uint32_t nslots;
    uint32_t run_max;          /* data bytes per slot */
    uint32_t slot_stride;      /* FAYT_PAGER_DESC_SIZE + run_max */
    uint32_t state;            /* FAYT_PAGER_* (faytd writes it) */
    uint32_t chain_id;
    uint32_t position;         /* 0: the first server of the chain */
    uint32_t server_waiting;   /* the server sleeps on req_head */
    uint32_t req_head;         /* futex: faytd, requests posted */
    uint32_t req_tail;         /* the server, requests taken */
    uint32_t ans_head;         /* the server, answers posted */
    uint32_t ans_tail;         /* faytd, answers reaped */
    uint32_t rung;             /* an eventfd write is outstanding */
    uint32_t reserved[3];
    uint32_t req_ring[64];     /* FAYT_PAGER_SLOTS_MAX */
    uint32_t ans_ring[64];
} __attribute__((packed));

struct fayt_page_request {
    uint64_t id;               /* faytd's request id */
    uint64_t offset;           /* bytes into the region, page aligned */
    uint32_t length;           /* bytes the access needs (one page) */
    uint32_t run_max;          /* bytes an answer may hold: prefetch up to here */
    uint32_t access;           /* FAYT_ACCESS_* */
    uint32_t flags;            /* FAYT_PAGE_PRESENT, FAYT_PAGE_CANCELLED */
    uint32_t hop;              /* 0 at the chain's first server */
    uint32_t chain_id;
    uint32_t region_id;
    int32_t client_pid;
    uint64_t region_length;    /* bytes of the region */
    uint32_t verdict;          /* the answer: FAYT_PAGE_* */
    int32_t error;             /* FAIL: a positive errno */
    uint32_t answer_length;    /* DATA: bytes written to the data; MAPPED: bytes to map;
                                * a multiple of 4096, at most run_max */
    uint32_t message_length;
    uint32_t backing;          /* BACKED: the id of this server's backing the region maps, else 0 */
    char chain[256];           /* FAYT_NAME_MAX + 1 */
    char message[4096];        /* FAYT_MESSAGE_MAX + 1 */
} __attribute__((packed));

/* What faytd reads from a userfaultfd (one per fault event). */
struct fayt_uffd_fault {
    uint64_t address;
    uint32_t flags;            /* UFFD_PAGEFAULT_FLAG_* */
    uint32_t tid;
} __attribute__((packed));

/* FAYT_SYS_CHAIN_JOIN body. */
struct fayt_chain_join {
    uint32_t slots;            /* 1..FAYT_PAGER_SLOTS_MAX (0: 8) */
    uint32_t run_max;          /* data bytes per slot, a multiple of 4096 (0: 64 KiB) */
    uint32_t flags;            /* FAYT_CHAIN_* (the first server sets the chain's) */
    uint32_t timeout_ms;       /* the chain's request timeout (0: faytd's default) */
    char name[256];
} __attribute__((packed));

/* FAYT_SYS_CHAIN_JOIN reply; two fds follow: the channel object, the eventfd. */
struct fayt_chain_join_reply {
    uint32_t chain_id;
    uint32_t position;
    uint32_t slots;
    uint32_t run_max;
    uint64_t map_length;
    uint32_t flags;            /* the chain's FAYT_CHAIN_* */
    uint32_t timeout_ms;
} __attribute__((packed));

/* FAYT_SYS_CHAIN_LEAVE body. */
struct fayt_chain_leave {
    uint32_t chain_id;
    uint32_t reserved;
} __attribute__((packed));

/* FAYT_SYS_CHAIN_BACK and FAYT_SYS_CHAIN_UNBACK body.  BACK: requests for
 * `message` may be answered from the ANON portal `handle` of this context
 * (one message per portal, one backing per message and server); faytd keeps
 * its frames while the backing or a region mapping it lives, the server's
 * unmap notwithstanding.  UNBACK (handle 0): no new region maps it; regions
 * that map it keep it (their requests no longer carry BACKED).  A backing
 * also goes when its server leaves the chain or dies. */
struct fayt_chain_back {
    uint32_t chain_id;
    uint32_t message_length;   /* bytes of message, at most FAYT_MESSAGE_MAX */
    uint64_t handle;           /* BACK: the ANON portal's handle; UNBACK: 0 */
    char message[4096];        /* FAYT_MESSAGE_MAX + 1 */
} __attribute__((packed));

/* FAYT_SYS_CHAIN_BACK reply. */
struct fayt_chain_back_reply {
    uint32_t backing;          /* its id, as page requests carry it */
    uint32_t reserved;
} __attribute__((packed));

/* fayt_portal_reply.flags (syscall.h) of a SPECIAL portal: one fd follows,
 * read-only, of the backing to map MAP_PRIVATE over the range. */
#define FAYT_PORTAL_REPLY_BACKED 0x2

/* userfaultfd(2) and its ioctls (src/uffd.c).  Each returns 0 or a positive
 * errno unless it says otherwise. */
#define FAYT_UFFD_USER_MODE   0x1   /* opened with UFFD_USER_MODE_ONLY */
#define FAYT_UFFD_WP          0x2   /* write-protect mode (anonymous memory) */
#define FAYT_UFFD_POISON      0x4   /* UFFDIO_POISON (Linux 6.6) */
#define FAYT_UFFD_MINOR       0x8   /* minor faults on shmem, UFFDIO_CONTINUE (5.14) */
/* Open a non-blocking userfaultfd with the features faytd uses.  Returns
 * the fd, or -errno; *caps gets FAYT_UFFD_*. */
int fayt_uffd_open(uint32_t *caps);
/* fayt_uffd_register modes, besides MISSING (always) */
#define FAYT_UFFD_REGISTER_WP    0x1
#define FAYT_UFFD_REGISTER_MINOR 0x2   /* shmem only: faults on pages its page cache holds */
int fayt_uffd_register(int fd, uint64_t addr, uint64_t len, int modes);
/* Fault events into out[max]; returns how many (0: none ready), or -errno. */
int fayt_uffd_read(int fd, struct fayt_uffd_fault *out, int max);
/* UFFDIO_COPY of len bytes, skipping pages already there; wakes dst..dst+len.
 * *copied gets the bytes copied. */
int fayt_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                   uint64_t *copied);
/* UFFDIO_POISON page by page, skipping pages already there; wakes. */
int fayt_uffd_poison(int fd, uint64_t addr, uint64_t len);

/* Channels: the server's side (faytd's is faytd/core/fault.c; a channel of
 * nslots slots of run_max data bytes is FAYT_PAGER_HEADER_SIZE + nslots *
 * (FAYT_PAGER_DESC_SIZE + run_max) bytes).  slot and data find a slot with
 * the header's stride. */
struct fayt_page_request *fayt_pager_slot(void *ch, uint32_t slot);
void *fayt_pager_data(void *ch, uint32_t slot);
/* Server: the next request's slot; -ETIMEDOUT, -EINTR (call again) or
 * -EPIPE (the channel was closed), -EPROTO (the request ring names a slot
 * past the channel's: its shared memory was scribbled on).  timeout_ns < 0
 * waits for ever.  It spins
 * for spin_ns (at most the timeout) before it sleeps on the futex. */
int fayt_pager_take(void *ch, int64_t timeout_ns, int64_t spin_ns);
/* Server: answer the slot and ring faytd's eventfd. */
int fayt_pager_answer(void *ch, uint32_t slot, uint32_t verdict, int32_t error,
                      uint32_t length, int eventfd);
/* The client's private anonymous range for a SPECIAL portal: anywhere
 * (addr 0) or exactly at addr.  0 and *err on failure. */
uintptr_t fayt_map_special(uint64_t length, uintptr_t addr, int prot, int *err);
/* SPECIAL|SHARE: map the share's object MAP_SHARED|MAP_FIXED over the range
 * reserved with fayt_map_special. */
uintptr_t fayt_map_over(int fd, uint64_t length, uintptr_t addr, int prot, int *err);
/* A backed SPECIAL portal: map the backing MAP_PRIVATE|MAP_FIXED over the
 * range, PROT_NONE until it is registered (then fayt_protect). */
uintptr_t fayt_map_private_over(int fd, uint64_t length, uintptr_t addr, int *err);
int fayt_protect(uintptr_t addr, uint64_t length, int prot);

/* memcpy with the GIL released (cffi drops it for every call): libportal's
 * copies into and out of special regions, which may fault and wait. */
void fayt_copy(uintptr_t dst, uintptr_t src, uint64_t n);

/* The client's guard against faytd's death.  A C thread (no GIL needed)
 * watches faytd's pidfd; when faytd dies it poisons every page not yet
 * supplied in the guarded regions, so blocked and later accesses get SIGBUS
 * rather than hanging or reading zeros. */
int fayt_special_guard(int faytd_pidfd, int uffd, uint64_t addr, uint64_t len);
void fayt_special_unguard(int uffd);

#endif
