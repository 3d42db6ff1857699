"""Wire protocol: typed messages grouped by direction, and the framing that carries them.

Every message is a frozen msgspec struct (tagged), encoded as msgpack in the first frame of a ZeroMQ
multipart message; large arrays (token ids, slot mappings, block ids, masks) follow as raw frames and
are never pickled. One decoder per socket direction (see ``codec``).
"""
