"""WeCom (企业微信) adapters: the self-built app's callback and sink, the AI bot (智能机器人) callback
and its reply sink, the group-robot webhook sink, and the shared API client."""
