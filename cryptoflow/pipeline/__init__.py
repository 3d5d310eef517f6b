"""reader -> normalize -> writer: the stages and the records between them."""
