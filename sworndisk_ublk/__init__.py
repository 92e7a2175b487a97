"""sworndisk-ublk: SwornDisk secure block devices served to the kernel through ublk.

Modules: `cli` (arguments, errors), `commands` (add/del/list/recover/stats), `admin`
(the offline verbs: keys, dump, header backup, check, resize; status), `table` (the
dmsetup-style table), `keys` (key files, passphrases), `terminal` (questions to a person),
`state` (/run/sworndisk), `names` (/dev/sworndisk/NAME), `tab` (/etc/sworndisktab), `boot`
(start/stop from the tab), `progress` (long operations on a terminal), `volume`
(format/open rules), `daemon` (the background server), `target` (block requests to engine
calls), `wlog` and `restore` (the write log of a recoverable server and recover's replay).
"""
