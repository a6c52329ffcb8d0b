/* fayt/portal.h: the memory portal system call, as the specification writes it.
 *
 * The portal classes are bits and combine (SHARE|ANON, SHARE|DIRECT, ...).
 * Protection bits have the values of Linux's PROT_*, so they pass to mmap(2)
 * unchanged.  Numbers here are ABI: never reuse a retired one.
 */
#ifndef FAYT_PORTAL_H
#define FAYT_PORTAL_H

#include <stdint.h>
#include <stddef.h>

#define FAYT_PAGE_SIZE 4096

/* Portal classes (portal_req.type). */
#define FAYT_PORTAL_SHARE   0x01
#define FAYT_PORTAL_DIRECT  0x02
#define FAYT_PORTAL_ANON    0x04
#define FAYT_PORTAL_COW     0x08
#define FAYT_PORTAL_SPECIAL 0x10
#define FAYT_PORTAL_CLASSES 0x1f

/* Protection (portal_req.prot, share-point meta prot). */
#define FAYT_PROT_NONE  0x0
#define FAYT_PROT_READ  0x1
#define FAYT_PROT_WRITE 0x2
#define FAYT_PROT_EXEC  0x4
#define FAYT_PROT_ALL   0x7

/* Share-point kinds (portal_req.share.type). */
#define FAYT_SHARE_TRIVIAL  0
#define FAYT_SHARE_ADVANCED 1   /* reserved: the advanced share-point is TBD */

/* share.create */
#define FAYT_SHARE_ATTACH 0
#define FAYT_SHARE_CREATE 1

/* Longest identifier or chain name, in bytes, without the NUL. */
#define FAYT_NAME_MAX 255
/* Longest sp_req_chain.message, in bytes, without the NUL. */
#define FAYT_MESSAGE_MAX 4095

struct portal_req {
    int type;
    int prot;
    int length;

    struct __attribute__((packed)) {
        const char *identifier;
        int type;
        int create;
    } share;

    struct {
        const char *name;
        const char *message;
    } sp_req_chain;

    struct __attribute__((packed)) {
        uintptr_t addr;
        size_t length;
        uint64_t paddr[];
    } morphology;
} __attribute__((packed));

#endif
