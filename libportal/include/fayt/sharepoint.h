/* fayt/sharepoint.h: the meta-structure at the start of every share-point.
 *
 * Layout, exactly as the specification writes it (packed):
 *   0  char lock         0 free, 1 held, 2 held with waiters; | 0x80 owner died
 *   1  int prot          what the share-point grants (FAYT_PROT_*)
 *   5  size_t length     bytes of data, starting at the data offset
 *  13  morphology.length bytes of the whole mapping (meta + data), page multiple
 *  21  morphology.paddr  one physical address per 4 KiB frame of the mapping
 * The data starts at the next 16-byte aligned offset after the whole structure,
 * paddr[] included: fayt_sp_data_offset(nframes).
 *
 * Waiters sleep with a futex on the aligned 32-bit word at offset 0: the lock
 * byte and the three low bytes of prot, which never change under a sleeper.
 */
#ifndef FAYT_SHAREPOINT_H
#define FAYT_SHAREPOINT_H

#include <stdint.h>
#include <stddef.h>

#define FAYT_LOCK_FREE       0x00
#define FAYT_LOCK_HELD       0x01
#define FAYT_LOCK_CONTENDED  0x02
#define FAYT_LOCK_STATE_MASK 0x7f
#define FAYT_LOCK_OWNER_DIED 0x80

struct fayt_sharepoint_meta {
    char lock;
    int prot;
    size_t length;
    struct {
        size_t length;
        uint64_t paddr[];
    } morphology;
} __attribute__((packed));

/* Where the data starts (fayt_sp_data_offset() for clients; faytd's core,
 * which does not link libportal's C, uses this). */
#define FAYT_SP_DATA_OFFSET(nframes) \
    ((sizeof(struct fayt_sharepoint_meta) + (size_t)(nframes) * sizeof(uint64_t) + 15) \
     & ~(size_t)15)

#endif
