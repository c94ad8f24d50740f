"""The receiving side of `serve`.

The C-STORE SCP, the durable spool and the quiet timers that decide a study is complete.
"""
