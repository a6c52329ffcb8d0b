/* journal.c: a share-point's journal records (core.h).
 *
 * The one writer of the S, D and A lines (faytd/journal.py's docstring
 * gives the format; its compaction asks fayt_journal_sp_line for S lines),
 * on the journal's O_APPEND descriptor (k->journal_fd), which faytd's
 * Python appends its own records to (C, G), one write(2) each, so that the
 * records stay in the order they happened.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define JOURNAL_LINE_MAX 13000

/* 0, or -1 if the record could not be written (counted for Python's log). */
int core_journal_write(struct fayt_core *k, const char *line, size_t n, int live)
{
    if (k->journal_fd < 0)
        return 0;
    k->journal_lines++;
    k->journal_live += live;
    ssize_t w = write(k->journal_fd, line, n);
    if (w != (ssize_t)n) {
        k->journal_errors++;
        return -1;
    }
    return 0;
}

int fayt_journal_sp_line(uint32_t sp_id, int32_t pid, uint64_t start, uint32_t uid,
                         int32_t prot, uint64_t length, const char *object,
                         const uint32_t *frames, uint32_t nframes, uint32_t ns,
                         const char *ident, uint32_t ilen, char *out, uint32_t max)
{
    size_t pos = (size_t)snprintf(out, max, "S %u %d %llu %u %d %llu %s ", sp_id, pid,
                                  (unsigned long long)start, uid, prot,
                                  (unsigned long long)length, object);
    for (uint32_t i = 0; i < nframes && pos < max; i++)
        pos += (size_t)snprintf(out + pos, max - pos, i ? ",%u" : "%u", frames[i]);
    if (pos < max)
        out[pos++] = ' ';
    for (uint32_t i = 0; i < ilen && pos < max; i++)
        pos += (size_t)snprintf(out + pos, max - pos, "%02x", (unsigned char)ident[i]);
    if (pos < max)                      /* format 3: the namespace last */
        pos += (size_t)snprintf(out + pos, max - pos, " %u", ns);
    if (pos + 1 >= max)
        return -1;
    out[pos++] = '\n';
    return (int)pos;
}

int core_journal_sharepoint(struct fayt_core *k, const struct sp *sp)
{
    if (k->journal_fd < 0)
        return 0;
    char object[2 * FAYT_OBJ_NAME_MAX + 1];
    snprintf(object, sizeof object, "%s%s%s", sp->object, sp->split ? "+" : "",
             sp->split ? sp->object2 : "");
    size_t room = 160 + sizeof object + (size_t)sp->nframes * 11 + 2 * FAYT_NAME_MAX;
    char stack[JOURNAL_LINE_MAX], *line = room <= sizeof stack ? stack : malloc(room);
    int n = line ? fayt_journal_sp_line(sp->id, sp->owner_pid, sp->owner_start, sp->owner_uid,
                                        sp->prot, sp->length, object, sp->frames, sp->nframes,
                                        sp->ns, sp->name->key, sp->name->len, line,
                                        (uint32_t)room)
                 : -1;
    int r = n < 0 ? (k->journal_errors++, -1) : core_journal_write(k, line, (size_t)n, 1);
    if (line != stack)
        free(line);
    return r;
}

int core_journal_attached(struct fayt_core *k, const struct fayt_fast_conn *c, uint32_t id)
{
    char line[48];
    int pos = snprintf(line, sizeof line, "A %u %u\n", c->ctx_id, id);
    return core_journal_write(k, line, pos, 1);
}

int fayt_journal_sp_destroyed(struct fayt_core *k, uint32_t sp_id)
{
    char line[32];
    int pos = snprintf(line, sizeof line, "D %u\n", sp_id);
    return core_journal_write(k, line, pos, -1);
}
