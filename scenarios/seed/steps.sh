# seed: load the seed thread's module between the start and stop markers.
stmark start
insmod /scenario/test.ko
stmark stop
module_marker test
