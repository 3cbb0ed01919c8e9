"""The Testpress side: HTTP, login, retries, pages and the crawler. Produces the batches of
sync.model.batches; never imports the sink."""
