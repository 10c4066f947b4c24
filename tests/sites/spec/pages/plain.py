def page(props):
    return "<html><body>plain</body></html>"
