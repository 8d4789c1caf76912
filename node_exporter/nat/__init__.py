"""NAT resolution: what a DNAT'ed (Service VIP) connection really reached, from conntrack."""
