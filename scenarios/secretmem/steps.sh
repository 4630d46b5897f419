# secretmem: a static program maps one memfd_secret page (it leaves the kernel
# direct map), writes and reads a secret, registers it with "secure-va VA 1",
# touches it again, ends the registration, unmaps it.
# Needs the kernel words in scenarios/secretmem/append (secretmem.enable=1).
stmark start
secretmem
stmark stop
