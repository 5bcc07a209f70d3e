"""The ``lorafleet`` command line: runs the API, the workers and the engine, and watches jobs.

It sits on top of the other packages: it may import ``api``, ``worker`` and ``shared``, and
none of them imports it.
"""
