"""The pager: chains of servers that supply the pages of SPECIAL portals.

A client maps a SPECIAL region, registers it with a userfaultfd and sends
faytd the fd with PORTAL (syscalls/chain.py); a thread that touches a page
not yet supplied sleeps in the Linux kernel while faytd asks the chain's
servers for it, in order, through a channel of shared slots each (pager.h),
and resolves the fault with their answer: the data copied in, a page of the
server's own memory mapped (answers by reference), or SIGBUS, never zeros.

Three parts, each the owner of its objects:
- chains.py: Chain, Member (a server's place and channel), Backing (a
  server's portal declared for answers by reference); join, leave, back,
  unback.
- regions.py: Region (one SPECIAL portal), SpecialShare (a SPECIAL|SHARE
  share-point); making and closing regions.
- faults.py: the fault engine, in C (faytd/core/fault.c): faults read,
  requests posted, answers checked and put in, deadlines, all inside
  faytd's wait with no Python; Python configures it and drains its events.

The Pager holds the three for the Kernel, which calls it when a mapping
goes, a context goes, or faytd stops; the syscall layer calls its parts.
"""
from .chains import Chains
from .faults import FaultEngine
from .regions import Regions


class Pager:
    def __init__(self, kernel):
        self.k = kernel
        self.chains = Chains(self)
        self.regions = Regions(self)
        self.faults = FaultEngine(self)

    def unmap(self, ctx, m):
        """A SPECIAL mapping of ctx goes: its region closes."""
        self.regions.unmap(ctx, m)

    def context_gone(self, ctx):
        self.regions.context_gone(ctx)
        self.chains.context_gone(ctx)

    def shutdown(self):
        self.regions.shutdown()
        self.chains.shutdown()
        self.faults.shutdown()
