"""The billing app: an invoice for every order the web shop announces."""
