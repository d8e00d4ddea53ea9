"""End-to-end tests of the web client in Chromium.

A package (unlike the other test folders), so that its conftest is imported as web.conftest and
does not take the place of another folder's `conftest` module in sys.modules.
"""
