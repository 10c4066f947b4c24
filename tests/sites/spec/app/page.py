def page(params):
    return "<html><body>home</body></html>"
