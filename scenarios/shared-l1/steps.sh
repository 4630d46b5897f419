# shared-l1: like private-root, but the secure page's L1 frame is also linked
# from the loading process's own (non-secure) PGD, at 0xffff808040201000
# through a second PUD/PMD pair; the normal root reads the secret
# through that alias after every pass. Expected: C3 critical (one shared L1
# frame with a secure leaf below it), plus C1/C2/C4 for the alias.
stmark start
insmod /scenario/shared_l1.ko
stmark stop
module_marker shared_l1
rmmod shared_l1
