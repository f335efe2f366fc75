"""WeChat Official Account (公众号) adapters: the message push (plaintext, compatible and safe modes)
and the customer-service message sink."""
