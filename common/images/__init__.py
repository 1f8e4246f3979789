"""The image path both services and the offline API share, transport-free (no grpc):

    intake.py          untrusted bytes -> upright RGB image, every step bounded
    vision_encoder.py  RGB image -> the checkpoint's processor -> the family's image features (HF's own modules)
    batcher.py         dynamic batching on one model thread; single flight
    local_encoder.py   LocalEncoder: decode + prepare on a pool, batch, encode (in this process)
    cache.py           the in-process LRU and the verified Redis cache (+ circuit_breaker.py)
    provider.py        EmbeddingProvider: key -> cache layers -> an ImageEncoder (local, or remote over gRPC)
    errors.py          domain errors with client-safe messages; the servicers map them to status codes
"""
