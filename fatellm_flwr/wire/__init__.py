"""Wire formats: what travels between the server and the clients, imported by both sides.

:mod:`.common` holds the keys every algorithm uses and the one array codec
(:func:`~.common.encode_arrays` / :func:`~.common.decode_arrays`); each algorithm with its
own payloads has a module here (:mod:`.fedkseed`, :mod:`.offsite`). Strategies and clients
import these modules, never each other.
"""
