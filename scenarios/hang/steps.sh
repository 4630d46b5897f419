# hang: never finish (tests the capture timeout).
stmark start
while :; do sleep 1; done
