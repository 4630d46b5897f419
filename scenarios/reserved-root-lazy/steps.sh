# reserved-root-lazy: reserved-root's module without the TLB flush after it
# removes its temporary memremap() window (flush=0, as vunmap leaves it: the
# flush is lazy). Under Xen's out-of-sync shadows (SHOPT_OUT_OF_SYNC, on by
# default) the window's L1 is out of sync, so its shadow entries still map
# the secure page in every root that shares the kernel half until Xen's next
# resync (this vCPU's next CR3 write): C1 critical at registration. With
# out_of_sync off the replay is as clean as reserved-root.
stmark start
insmod /scenario/reserved_root.ko flush=0
stmark stop
module_marker reserved_root
rmmod reserved_root
