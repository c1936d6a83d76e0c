"""MCP (Model Context Protocol) client side: the server's own tools, from MCP servers.

config   the config file (oMLX's `servers` or Claude Desktop's `mcpServers`)
tools    one MCP tool as the server exposes it (`<server>__<tool>`)
client   one connection per MCP server, in its own task, reconnecting with backoff
manager  all connections of a config: start, stop, status, the tool registry
executor runs a tool call: schema check, timeout, result as text
"""
