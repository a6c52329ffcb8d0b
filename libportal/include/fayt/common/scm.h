/* scm.h: descriptors in a message (SCM_RIGHTS), for every sender and
 * receiver of them: libportal's call (transport.c), faytd's replies and
 * requests (faytd/core/serve.c) and faytd's object keeper (keeper.c).
 * Common C, not a layout: cffi does not read it.
 *
 * Linux facts it relies on:
 * - recvmsg(2) installs every descriptor a message carries that fits the
 *   control buffer (MSG_CTRUNC says some did not; those are closed by the
 *   kernel); each one installed is the receiver's to close.  So a reader
 *   that keeps at most `max` closes the rest at once: a peer that sends
 *   more than asked cannot make the receiver leak descriptors.
 * - Control messages are walked with CMSG_FIRSTHDR/CMSG_NXTHDR; a message
 *   from a hostile peer may carry several, and only SOL_SOCKET/SCM_RIGHTS
 *   ones hold descriptors.
 */
#ifndef FAYT_COMMON_SCM_H
#define FAYT_COMMON_SCM_H

#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A control buffer with room for n descriptors, aligned for cmsghdr. */
#define FAYT_SCM_BUFFER(name, n)                                                    \
    union {                                                                         \
        struct cmsghdr h;                                                           \
        char buf[CMSG_SPACE(sizeof(int) * (n))];                                    \
    } name

/* Attach fds[0..n) to mh as one SCM_RIGHTS message, in cbuf (a
 * FAYT_SCM_BUFFER of room for n at least).  n 0: no control message. */
static inline void fayt_scm_put(struct msghdr *mh, void *cbuf, const int *fds, int n)
{
    if (n <= 0) {
        mh->msg_control = NULL;
        mh->msg_controllen = 0;
        return;
    }
    memset(cbuf, 0, CMSG_SPACE(sizeof(int) * n));
    mh->msg_control = cbuf;
    mh->msg_controllen = CMSG_SPACE(sizeof(int) * n);
    struct cmsghdr *c = CMSG_FIRSTHDR(mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * n);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * n);
}

/* The descriptors a received message carried: the first max go to out[]
 * in order, any more are closed.  Returns how many are in out[]. */
static inline int fayt_scm_take(struct msghdr *mh, int *out, int max)
{
    int n = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (n < max)
                out[n++] = fd;
            else
                close(fd);
        }
    }
    return n;
}

#endif
