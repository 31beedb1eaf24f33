"""ftctl.cli"""
