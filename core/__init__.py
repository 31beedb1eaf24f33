"""ftctl.core"""
