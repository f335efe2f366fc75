"""Redis scripts of the WeChat API pieces (the access-token cache, ``adapters.wechat.tokens``), one
``.lua`` file each, loaded with :func:`bridge.lua.source` (``package="adapters.wechat.lua"``)."""
