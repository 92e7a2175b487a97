"""sworndisk-ublk: SwornDisk secure block devices served to the kernel through ublk.

Modules: `cli` (arguments, errors), `commands` (add/del/list/recover/stats), `table`
(the dmsetup-style table), `keys` (key files, passphrases), `state` (/run/sworndisk),
`volume` (format/open rules), `daemon` (the background server), `target` (block
requests to engine calls), `busy` (who uses a device).
"""
