# fork: a static program writes a 16-page private buffer, forks 4 children
# that each COW-write 4 of its pages, read a shared one and touch 2 fresh
# pages, then exit; the parent waits and rewrites its buffer. Many roots
# sharing the kernel half; nothing registered as secure.
stmark start
forktouch
stmark stop
