/* core.c: struct fayt_core's life (core.h). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "fault.h"

int fayt_core_abi(void)
{
    return CORE_ABI;
}

int fayt_core_init(struct fayt_core *k)
{
    struct fayt_core_priv *p = calloc(1, sizeof *p);
    if (!p)
        return ENOMEM;
    pthread_mutex_init(&p->keeper.mu, NULL);
    pthread_mutex_init(&p->pool.mu, NULL);
    p->keeper.fd = -1;
    p->epfd = -1;
    p->reply = malloc(sizeof(struct fayt_rep_hdr) + FAYT_MSG_MAX);
    if (!p->reply) {
        free(p);
        return ENOMEM;
    }
    k->priv = p;
    k->journal_fd = -1;
    k->next_sp_id = 1;
    return 0;
}

void fayt_core_fini(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    if (!p)
        return;
    fayt_faults_fini(k);
    core_table_fini(k);
    core_direct_fini(k);
    core_names_fini(k);
    free(p->reply);
    free(p->watched);
    free(p->pool.queue);
    fayt_frames_fini(&k->frames);
    free(p);
    k->priv = NULL;
}
