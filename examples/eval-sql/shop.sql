-- A small shop database for the SQL-assistant eval (built into a temporary SQLite file by `tunesmith eval`).
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                     amount REAL NOT NULL, placed_on TEXT NOT NULL);
INSERT INTO customers VALUES (1, 'Ann', 'Paris'), (2, 'Bob', 'Lyon'), (3, 'Cid', 'Paris'), (4, 'Dee', 'Rome'),
                             (5, 'Eve', 'Oslo');
INSERT INTO orders VALUES (1, 1, 120.0, '2024-01-03'), (2, 1, 80.5, '2024-02-11'), (3, 2, 35.0, '2023-12-30'),
                          (4, 3, 210.0, '2024-03-01'), (5, 3, 15.25, '2024-03-02'), (6, 4, 99.0, '2024-05-20'),
                          (7, 5, 60.0, '2022-07-14'), (8, 2, 44.0, '2024-06-01');
