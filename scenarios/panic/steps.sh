# panic: crash the guest kernel inside the capture window (tests that a
# capture of a panicking guest fails cleanly and keeps the partial trace).
stmark start
echo c > /proc/sysrq-trigger
stmark stop
