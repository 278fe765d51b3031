"""The recommendation pipeline: its interface and the answers both implementations build
(`interface`), and the in-process pipeline (`in_process`); the gateway's remote one is
`service.api.remote`."""
