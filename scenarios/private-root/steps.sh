# private-root: a SIM-like module builds its own PGD (kernel half copied) and
# maps one secure page through its own PUD/PMD/PTE at 0xffff800040201000,
# switches CR3 there 4 times (write+read), switches back, frees everything.
# It registers secure-root/secure-frame itself and ends with secure-end.
stmark start
insmod /scenario/private_root.ko
stmark stop
module_marker private_root
rmmod private_root
