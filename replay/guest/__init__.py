"""The guest as the trace shows it: its page tables and its symbols.

``memory`` holds the reconstructed guest page tables and the x86-64 walker
(what the hardware would translate); ``symbols`` names guest PCs from the
kernel's and the scenario modules' symbols.
"""

from .memory import Access, GuestMemory, Walk, WalkStatus, cr3_root, va_index

__all__ = ["GuestMemory", "Walk", "WalkStatus", "Access", "cr3_root", "va_index"]
