"""Guest kernel introspection: gdbstub client (``rsp``) and guest-value decoders (``decode``).

Everything read from the guest is hostile input: decoders bound every read
and refuse what the guest kernel itself would refuse.
"""
